"""The selfheal node agent: collects, probes, supervises units and executes signed commands.

The composition root is ``agent.app.run_agent``; see ``docs/ARCHITECTURE.md``.
"""
