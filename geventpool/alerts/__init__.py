"""Alerting: turn runtime events into notifications for operators, without slowing a caller.

:class:`~geventpool.alerts.alerter.Alerter` listens to geventpool's events, keeps the state of
each alertable condition (:mod:`~geventpool.alerts.conditions`) under a policy of dedupe,
repeats, resolved notices and a rate limit (:mod:`~geventpool.alerts.policy`), and delivers
notifications (:mod:`~geventpool.alerts.notification`) through channels
(:mod:`~geventpool.alerts.channels`): the log, SMTP, webhooks, SMS gateways, a callable.
"""
