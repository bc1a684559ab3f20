"""Chat prompts: render messages with the tokenizer's chat template (or a documented default), and text assembly
with stop sequences for streaming.

The template is, in order of preference: ``chat_template.jinja`` beside the model, the ``chat_template`` of its
``tokenizer_config.json`` (a string, or a list of named templates: "default" is used), else
:data:`DEFAULT_CHAT_TEMPLATE`::

    <|system|>
    You are terse.
    <|user|>
    Hi!
    <|assistant|>

i.e. each message as ``<|ROLE|>\\nCONTENT\\n`` and ``<|assistant|>\\n`` to ask for the reply; with the default
template the reply also stops at ``<|user|>``, ``<|system|>`` or ``<|assistant|>`` (the model starting a turn).
Templates run in jinja2's sandbox with ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and
``raise_exception`` as in transformers.

Prefix caching: the leading system (and developer) messages, rendered alone, form the cacheable prefix when the
full rendering starts with that text; the prefix and the rest are then tokenized separately (the prompt's tokens
are those two lists joined, cache on or off).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["ChatTemplate", "DEFAULT_CHAT_TEMPLATE", "DEFAULT_CHAT_STOP", "StopTextStream", "load_chat_config"]

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_CHAT_STOP = ("<|user|>", "<|system|>", "<|assistant|>")


def _token_text(v) -> Optional[str]:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def load_chat_config(directories: Sequence[str]) -> dict:
    """``{"chat_template": str or None, "bos_token": str or None, "eos_token": str or None}`` from the first
    directory that holds a chat_template.jinja or a tokenizer_config.json."""
    out = {"chat_template": None, "bos_token": None, "eos_token": None}
    for d in directories:
        if d is None:
            continue
        jinja = os.path.join(d, "chat_template.jinja")
        cfg_path = os.path.join(d, "tokenizer_config.json")
        found = False
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                try:
                    cfg = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
            if isinstance(cfg, dict):
                found = True
                tpl = cfg.get("chat_template")
                if isinstance(tpl, list):  # [{"name": ..., "template": ...}]
                    named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
                    tpl = named.get("default")
                out["chat_template"] = tpl if isinstance(tpl, str) and tpl.strip() else None
                out["bos_token"] = _token_text(cfg.get("bos_token"))
                out["eos_token"] = _token_text(cfg.get("eos_token"))
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                out["chat_template"] = f.read()
            found = True
        if found:
            break
    return out


class ChatTemplate:
    """A compiled chat template. ``render(messages, add_generation_prompt)`` -> text; ``default`` says whether it
    is the built-in one (which brings its stop strings)."""

    def __init__(self, template: Optional[str] = None, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        self.default = template is None
        self.source = DEFAULT_CHAT_TEMPLATE if template is None else template
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self._tpl = env.from_string(self.source)
        except TemplateError as e:
            raise ValueError(f"the chat template does not compile: {e}") from None
        self._extra = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        self.stop = DEFAULT_CHAT_STOP if self.default else ()

    def render(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        from jinja2.exceptions import TemplateError
        try:
            return self._tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **self._extra)
        except TemplateError as e:
            raise ValueError(f"the chat template rejected the messages: {e}") from None

    def encode(self, tokenizer, messages: List[Dict[str, str]]) -> Tuple[List[int], Optional[int]]:
        """(prompt token ids, length of the cacheable system prefix or None)."""
        full = self.render(messages, True)
        k = 0
        while k < len(messages) and messages[k]["role"] in ("system", "developer"):
            k += 1
        if 0 < k < len(messages):
            try:
                head = self.render(messages[:k], False)
            except ValueError:
                head = ""
            if head and full.startswith(head) and len(head) < len(full):
                a = tokenizer.encode(head)
                b = tokenizer.encode(full[len(head):])
                if a and b:
                    return a + b, len(a)
        return tokenizer.encode(full), None


class StopTextStream:
    """Token ids in, text out, cut at the first stop sequence: text that could still be the start of a stop
    sequence is held back until it is known not to be one, so a streamed reply never shows part of a stop.

    ``push(id) -> (text, stopped)``, then ``finish() -> text`` (what was held back, when no stop came).
    """

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self._dec = tokenizer.stream_decoder()
        self.stops = [s for s in stops if s]
        self._buf = ""
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> Tuple[str, bool]:
        if self.stopped:
            return "", True
        self._buf += self._dec.push(token_id)
        return self._scan(False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._buf += self._dec.flush()
        return self._scan(True)[0]

    def _scan(self, final: bool) -> Tuple[str, bool]:
        buf = self._buf
        cut = -1
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            out, self._buf, self.stopped = buf[:cut], "", True
        elif final:
            out, self._buf = buf, ""
        else:
            hold = 0
            for s in self.stops:
                for k in range(min(len(s) - 1, len(buf)), hold, -1):
                    if buf.endswith(s[:k]):
                        hold = k
                        break
            out, self._buf = buf[:len(buf) - hold], buf[len(buf) - hold:]
        self.text += out
        return out, self.stopped
