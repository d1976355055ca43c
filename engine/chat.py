"""Chat prompts from a Jinja chat template (GPT-2 ships none): the server's ``--chat-template`` and ``LLM.chat``.

The template sees transformers' variables: ``messages`` (dicts with ``role`` and ``content``),
``add_generation_prompt``, ``bos_token`` and ``eos_token`` (both ``<|endoftext|>`` for GPT-2), and runs in Jinja's
immutable sandbox. jinja2 comes with the ``serve`` extra.
"""

from __future__ import annotations


class ChatTemplate:
    """A compiled chat template; ``ValueError`` naming ``what`` when it does not compile or does not render."""

    def __init__(self, source: str, eos_token: str, what: str = "chat_template") -> None:
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ValueError(f"{what}: chat templates need jinja2 (pip install -e '.[serve]')") from None
        if not isinstance(source, str):
            raise ValueError(f"{what} must be a Jinja template string, got {type(source).__name__}")
        self._errors = jinja2.TemplateError
        try:
            self._template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{what}: line {e.lineno}: {e.message}") from None
        self.eos_token = eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt for one conversation."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"messages must be a list of dicts (role, content), got {messages!r:.80}")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.eos_token, eos_token=self.eos_token)  # fmt: skip
        except self._errors as e:
            raise ValueError(f"the chat template failed on these messages: {e}") from None
