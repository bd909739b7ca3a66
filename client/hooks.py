"""``VLLMToolValidationHooks``: tool-call errors an RL policy can learn from.

Same API and messages as strands-vllm 0.0.6:

* ``Error: unknown tool: fake_tool | allowed_tools=[calculator, search, ...]``
* ``Error: tool_name=<calculator> | missing required argument(s): expression``
* ``Error: tool_name=<calculator> | unknown argument(s): invalid_param``
* ``Error: tool_name=<calculator> | tool input must be an object``

One change: unknown arguments are reported unless the schema allows extra properties
(``additionalProperties`` true or a schema). strands-vllm checked only when it was explicitly
``false``, which the schemas Strands' ``@tool`` generates never say, so the check never fired for them
although the tool call would then fail on the unexpected keyword.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from strands.hooks import BeforeToolCallEvent, HookProvider, HookRegistry
from strands.types.tools import ToolSpec


def tool_input_schema(tool_spec: ToolSpec) -> dict[str, Any]:
    """The JSON schema of a tool's input (``inputSchema.json``, or ``inputSchema`` itself)."""
    input_schema: Any = tool_spec.get("inputSchema", {})
    if isinstance(input_schema, dict) and isinstance(input_schema.get("json"), dict):
        return dict(input_schema["json"])
    return dict(input_schema) if isinstance(input_schema, dict) else {}


def check_tool_input(tool_name: str, tool_input: Any, tool_spec: ToolSpec) -> str | None:
    """The first problem with a tool call's arguments, as an error message, or None."""
    if tool_input is None:
        tool_input = {}
    if not isinstance(tool_input, dict):
        return f"Error: tool_name=<{tool_name}> | tool input must be an object"
    schema = tool_input_schema(tool_spec)
    required = schema.get("required", [])
    if isinstance(required, list):
        missing = [name for name in required if isinstance(name, str) and name not in tool_input]
        if missing:
            return f"Error: tool_name=<{tool_name}> | missing required argument(s): {', '.join(missing)}"
    properties = schema.get("properties")
    extra_allowed = schema.get("additionalProperties", False)
    if isinstance(properties, dict) and extra_allowed is False:
        unknown = sorted(str(name) for name in tool_input if name not in properties)
        if unknown:
            return f"Error: tool_name=<{tool_name}> | unknown argument(s): {', '.join(unknown)}"
    return None


def format_allowed_tools(tool_names: Iterable[str], *, max_items: int) -> str:
    """``[a, b, ... (+3 more)]``."""
    names = [name for name in tool_names if isinstance(name, str)]
    shown = names[:max_items]
    suffix = "" if len(shown) == len(names) else f", ... (+{len(names) - len(shown)} more)"
    return "[" + ", ".join(shown) + suffix + "]"


@dataclass(slots=True)
class VLLMToolValidationHooks(HookProvider):
    """Cancels an invalid tool call with a deterministic message the model sees as the tool result."""

    include_allowed_tools_in_errors: bool = True
    max_allowed_tools_in_error: int = 25
    validate_input_shape: bool = True

    def register_hooks(self, registry: HookRegistry, **kwargs: Any) -> None:
        registry.add_callback(BeforeToolCallEvent, self.before_tool_call)

    def before_tool_call(self, event: BeforeToolCallEvent) -> None:
        tool_name = str(event.tool_use.get("name", ""))
        if event.selected_tool is None:
            allowed = ""
            if self.include_allowed_tools_in_errors:
                names = format_allowed_tools(
                    event.agent.tool_names, max_items=self.max_allowed_tools_in_error
                )
                allowed = f" | allowed_tools={names}"
            event.cancel_tool = f"Error: unknown tool: {tool_name}{allowed}"
            return
        if not self.validate_input_shape:
            return
        error = check_tool_input(tool_name, event.tool_use.get("input"), event.selected_tool.tool_spec)
        if error:
            event.cancel_tool = error
