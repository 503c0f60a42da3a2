"""Sending alerts: the message, the sinks (log, callables, JSON webhooks, Slack, Discord,
Microsoft Teams, Feishu/Lark, DingTalk, WeCom, e-mail) and the courier thread that delivers
them with retries, never on the caller's thread."""
