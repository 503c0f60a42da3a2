"""The sinks an alert can go to, each in the shape its vendor documents.

A sink is given as a URL (its kind is known from the host: ``hooks.slack.com`` is Slack,
``open.feishu.cn`` Feishu…; any other URL gets the alert's JSON) or as a table with ``type``
(``slack``, ``discord``, ``teams``, ``feishu``, ``lark``, ``dingtalk``, ``wecom``, ``webhook``,
``email``) and its fields. Feishu/Lark and DingTalk custom robots sign their messages when a
``secret`` is set (HMAC-SHA256, as their documentation specifies). Text from the ledger
(provider, model, project names) is escaped for each vendor's markup, and Discord is told to
mention nobody, so a hostile name cannot ping a channel or forge a link.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlsplit

from .._errors import ConfigError
from .courier import Undelivered, is_webhook, post, redact_url
from .message import AlertMessage

__all__ = ["Sink", "sink_of", "request_for", "send_email", "SINK_TYPES"]

SINK_TYPES = ("webhook", "slack", "discord", "teams", "feishu", "lark", "dingtalk", "wecom", "email")
_HOSTS = (  # (host suffix, path prefix, type)
    ("hooks.slack.com", "", "slack"),
    ("discord.com", "/api/webhooks/", "discord"), ("discordapp.com", "/api/webhooks/", "discord"),
    ("webhook.office.com", "", "teams"), ("logic.azure.com", "", "teams"),
    ("open.feishu.cn", "/open-apis/bot/", "feishu"), ("open.larksuite.com", "/open-apis/bot/", "lark"),
    ("oapi.dingtalk.com", "/robot/", "dingtalk"), ("qyapi.weixin.qq.com", "/cgi-bin/webhook/", "wecom"),
)
_FIELDS = ("type", "url", "secret", "host", "port", "sender", "to", "username", "password_env",
           "starttls", "timeout_s")
_COLOR = {"critical": 0xB42318, "warning": 0xB4530B}


@dataclass(frozen=True)
class Sink:
    """Where alerts go (see the module's docs). Its repr hides the URL's path and the secret."""

    type: str
    url: str | None = None
    secret: str | None = None     # Feishu/Lark, DingTalk signing secret
    host: str | None = None       # e-mail: the SMTP server
    port: int = 25
    sender: str | None = None
    to: tuple[str, ...] = ()
    username: str | None = None
    password_env: str | None = None  # the variable holding the SMTP password (never the password)
    starttls: bool = False
    timeout_s: float = 10.0

    def __repr__(self) -> str:
        where = redact_url(self.url) if self.url else f"smtp://{self.host}:{self.port}"
        return f"Sink({self.type!r}, {where!r})"

    @property
    def where(self) -> str:
        """For the log: the URL cut to scheme and host (a generic webhook's), or the kind and
        that (``slack https://hooks.slack.com/…``)."""
        shown = redact_url(self.url) if self.url else f"smtp://{self.host}:{self.port}"
        return shown if self.type == "webhook" else f"{self.type} {shown}"


def _detect(url: str) -> str:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    for suffix, path, kind in _HOSTS:
        if (host == suffix or host.endswith("." + suffix)) and parts.path.startswith(path):
            return kind
    return "webhook"


def sink_of(target: Any, where: str = "alerts") -> Sink:
    """A URL or a table as a Sink, checked (ConfigError naming ``where`` and the field)."""
    if isinstance(target, Sink):
        return target
    if is_webhook(target):
        return Sink(_detect(target), url=target)
    if not isinstance(target, Mapping):
        shown = redact_url(target) if isinstance(target, str) else type(target).__name__
        raise ConfigError(f"{where}: {shown!r} is not a sink; use \"log\", a webhook URL, or a "
                          "table such as {type = \"slack\", url = \"https://hooks.slack.com/...\"}")
    unknown = sorted(set(target) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; a sink has {', '.join(_FIELDS)}")
    kind = target.get("type") or (_detect(target["url"]) if is_webhook(target.get("url")) else None)
    if kind not in SINK_TYPES:
        raise ConfigError(f"{where}: type={target.get('type')!r}; use one of {', '.join(SINK_TYPES)}")
    fields = {key: value for key, value in target.items() if key != "type"}
    if kind == "email":
        to = fields.get("to")
        fields["to"] = (to,) if isinstance(to, str) else tuple(to or ())
        if not fields.get("host") or not fields.get("sender") or not fields["to"]:
            raise ConfigError(f"{where}: an email sink needs host, sender and to "
                              "(e.g. {type = \"email\", host = \"smtp.example.com\", sender = "
                              "\"llm@example.com\", to = [\"oncall@example.com\"]})")
        port = fields.get("port", 25)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"{where}: port={port!r} must be 1 to 65535")
        if fields.get("password_env") and not fields.get("username"):
            raise ConfigError(f"{where}: password_env needs username")
    elif not is_webhook(fields.get("url")):
        raise ConfigError(f"{where}: a {kind} sink needs url = \"https://...\"")
    secret = fields.get("secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise ConfigError(f"{where}: secret must be a non-empty string")
    return Sink(kind, **fields)


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _markdown_escape(text: str) -> str:
    """Markdown (DingTalk, WeCom, Teams): no link, emphasis or heading from a name."""
    return "".join("\\" + c if c in "\\`*_{}[]()#+-.!|<>~" else c for c in text)


def _discord_escape(text: str) -> str:
    """Discord markdown: no masked link ``[text](url)``, no ``<url>``/``<t:…>`` tag, no
    emphasis, spoiler or code from a name (``[CRITICAL]`` itself stays as it is)."""
    out = "".join("\\" + c if c in "\\*_~`|<>" else c for c in text)
    return out.replace("](", "]\\(")


def _sign_feishu(secret: str, timestamp: int) -> str:
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


def _sign_dingtalk(secret: str, timestamp_ms: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def request_for(sink: Sink, message: AlertMessage, now: float | None = None
                ) -> tuple[str, dict[str, Any]]:
    """(URL, JSON body) of ``message`` for a webhook-type ``sink``, signed when it has a secret."""
    now = time.time() if now is None else now
    url = str(sink.url)
    kind = sink.type
    if kind == "slack":
        text = _slack_escape(message.text)
        blocks: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": message.title[:150]}},
            {"type": "section", "text": {"type": "mrkdwn",
                                         "text": _slack_escape("\n".join(message.lines))[:2900]}}]
        if message.link:
            blocks.append({"type": "context", "elements": [
                {"type": "mrkdwn", "text": f"<{_slack_escape(message.link)}|open>"}]})
        return url, {"text": text[:3000], "blocks": blocks}
    if kind == "discord":
        return url, {"content": _discord_escape(message.title)[:2000],
                     "allowed_mentions": {"parse": []},
                     "embeds": [{"title": message.title[:256],
                                 "description": "\n".join(map(_discord_escape,
                                                              message.lines))[:4000],
                                 "color": _COLOR.get(message.severity, 0x3B6FD8),
                                 **({"url": message.link} if message.link else {})}]}
    if kind == "teams":
        body: list[dict[str, Any]] = [
            {"type": "TextBlock", "text": _markdown_escape(message.title), "weight": "Bolder",
             "size": "Medium", "wrap": True,
             "color": "Attention" if message.severity == "critical" else "Warning"},
            *({"type": "TextBlock", "text": _markdown_escape(line), "wrap": True}
              for line in message.lines)]
        card: dict[str, Any] = {"$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                                "type": "AdaptiveCard", "version": "1.4", "body": body}
        if message.link:
            card["actions"] = [{"type": "Action.OpenUrl", "title": "Open", "url": message.link}]
        return url, {"type": "message", "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None,
             "content": card}]}
    if kind in ("feishu", "lark"):
        # a text message turns <at user_id="all"></at> into @all: no tag from a name
        payload: dict[str, Any] = {"msg_type": "text",
                                   "content": {"text": message.text.replace("<", "\uff1c")}}
        if sink.secret:
            stamp = int(now)
            payload = {"timestamp": str(stamp), "sign": _sign_feishu(sink.secret, stamp), **payload}
        return url, payload
    if kind == "dingtalk":
        if sink.secret:
            stamp = int(now * 1000)
            sign = quote_plus(_sign_dingtalk(sink.secret, stamp))
            url += ("&" if "?" in url else "?") + f"timestamp={stamp}&sign={sign}"
        return url, {"msgtype": "text", "text": {"content": message.text}}
    if kind == "wecom":
        # WeCom's limit is 2048 bytes of UTF-8, not characters
        content = message.text.encode("utf-8")[:2048].decode("utf-8", "ignore")
        return url, {"msgtype": "text", "text": {"content": content}}
    return url, message.data


def send_email(sink: Sink, message: AlertMessage) -> None:
    """One e-mail over SMTP (STARTTLS when asked; the password from ``password_env``)."""
    import smtplib
    from email.message import EmailMessage

    from .courier import Undelivered

    mail = EmailMessage()
    mail["Subject"] = message.title.replace("\r", " ").replace("\n", " ")[:200]
    mail["From"] = str(sink.sender)
    mail["To"] = ", ".join(sink.to)
    mail.set_content(message.text)
    try:
        with smtplib.SMTP(str(sink.host), sink.port, timeout=sink.timeout_s) as smtp:
            if sink.starttls:
                smtp.starttls()
            if sink.username:
                password = os.environ.get(sink.password_env or "", "")
                smtp.login(sink.username, password)
            smtp.send_message(mail)
    except (OSError, smtplib.SMTPException) as exc:
        raise Undelivered(type(exc).__name__) from None


def deliver_once(sink: Sink, message: AlertMessage, timeout_s: float) -> None:
    """One attempt at delivering ``message`` to ``sink`` (raises Undelivered)."""
    if sink.type == "email":
        send_email(sink, message)
        return
    url, payload = request_for(sink, message)
    answer = post(url, json.dumps(payload, ensure_ascii=False, default=str).encode("utf-8"), {},
                  min(timeout_s, sink.timeout_s))
    if sink.type in ("feishu", "lark", "dingtalk", "wecom"):
        # these answer HTTP 200 to a refused message (bad signature, too long...): the code
        # in the body says whether it was accepted
        try:
            body = json.loads(answer or b"{}")
        except ValueError:
            body = {}
        code = body.get("code", body.get("errcode", body.get("StatusCode", 0))) \
            if isinstance(body, dict) else 0
        if code not in (0, None):
            raise Undelivered(f"{sink.type} refused the message (code {code})")
