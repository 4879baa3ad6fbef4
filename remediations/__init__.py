"""Remediation plans as data, the pure planner and guards that make them.

``plans`` is the frozen model, ``guards`` and ``planner`` are pure functions of
(state, rule, now); executing a plan is the controller's dispatcher's job.
"""
