"""The formatters, one per destination kind, in an explicit dict the composition root passes in."""

from __future__ import annotations

from controller.notify.alertmanager import AlertmanagerFormatter
from controller.notify.discord import DiscordFormatter
from controller.notify.googlechat import GoogleChatFormatter
from controller.notify.mattermost import MattermostFormatter
from controller.notify.model import Formatter
from controller.notify.slack import SlackFormatter
from controller.notify.teams import TeamsFormatter


def default_formatters() -> dict[str, Formatter]:
    """Destination kind (``controller.notify[].kind``) → formatter."""
    return {"slack": SlackFormatter(), "mattermost": MattermostFormatter(), "teams": TeamsFormatter(),
            "discord": DiscordFormatter(), "googlechat": GoogleChatFormatter(),
            "alertmanager": AlertmanagerFormatter()}
