"""A call's certificate: what produced its tokens, as one id a trainer can select sequences by.

The fields (table ``certificates``, migration 0009):

* ``template_hash``: the upstream's default chat template (its fingerprint, ``upstream/identity.py``)
  with the request's ``chat_template``, ``chat_template_kwargs`` and ``tools``: what decides how
  messages become prompt tokens;
* ``model``, ``model_root``, ``tokenizer``, ``vllm_version``: from the upstream's identity;
* ``sampling_digest`` (and ``sampling``, the parameters themselves): every request field that shapes
  the distribution tokens are drawn from (temperature, top_p, top_k, penalties, logit_bias,
  response_format, tool_choice, ...). Left out: the messages and rendering fields above, and what only
  picks a sample or where it stops (``seed``, ``n``, ``max_tokens``, ``stop``), or what is returned
  (``stream``, ``logprobs``, ``return_token_ids``), so the calls of one rollout setup share a certificate;
* ``weight_version``: the policy version the call was sent under.

``id`` is a hash of all of them: equal ids, equal fields. Computed on the writer thread.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from tokentrail.proxy import jsonio
from tokentrail.proxy.recording.capture import RENDER_FIELDS
from tokentrail.proxy.recording.records import CallRecord

NOT_SAMPLING = frozenset(
    {
        # what is rendered, and how (in template_hash)
        "messages",
        "prompt",
        "tools",
        "chat_template",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
        "documents",
        "mm_processor_kwargs",
        # which sample, where it stops, what is returned, routing
        "model",
        "seed",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "stop_token_ids",
        "include_stop_str_in_output",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "prompt_logprobs",
        "echo",
        "return_token_ids",
        "return_tokens_as_token_ids",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "user",
        "metadata",
        "store",
        "request_id",
        "priority",
        "cache_salt",
        "kv_transfer_params",
        "prompt_token_ids",
        "parallel_tool_calls",
        "vllm_xargs",
    }
)
_COLUMNS = (
    "template_hash",
    "model",
    "model_root",
    "tokenizer",
    "vllm_version",
    "sampling_digest",
    "weight_version",
)


@dataclass(frozen=True, slots=True)
class Certificate:
    id: str
    template_hash: str
    model: str | None
    model_root: str | None
    tokenizer: str | None
    vllm_version: str | None
    sampling_digest: str
    sampling: dict[str, Any]
    weight_version: str | None


def _digest(value: Any) -> str:
    return hashlib.sha256(jsonio.dumps_text(value).encode()).hexdigest()


def sampling_of(request: dict[str, Any]) -> dict[str, Any]:
    """The request's sampling parameters (see the module docstring), keys sorted."""
    return {k: request[k] for k in sorted(request) if k not in NOT_SAMPLING and request[k] is not None}


def certify(record: CallRecord) -> Certificate:
    """The record's certificate. The calls of one rollout setup share it, so it is made once per
    distinct input and looked up after that: the hashes cost a writer thread ~5 µs a call, the lookup
    key (one serialisation) a third of that."""
    request = record.request if isinstance(record.request, dict) else {}
    identity = record.upstream_identity or {}
    sampling = sampling_of(request)
    key = jsonio.dumps_text(
        [
            [identity.get(name) for name in _IDENTITY_FIELDS],
            [request.get(name) for name in RENDER_FIELDS],
            sampling,
            record.model,
            record.weight_version,
        ]
    )
    made = _made.get(key)
    if made is None:
        if len(_made) >= _MADE_MAX:
            _made.clear()
        made = _made[key] = _certify(record, request, identity, sampling)
    return made


_IDENTITY_FIELDS = ("template", "model", "model_root", "tokenizer", "vllm_version")
_MADE_MAX = 4096
_made: dict[str, Certificate] = {}  # the writer thread's (the only caller)


def _certify(
    record: CallRecord, request: dict[str, Any], identity: dict[str, Any], sampling: dict[str, Any]
) -> Certificate:
    template_hash = _digest([identity.get("template"), *(request.get(name) for name in RENDER_FIELDS)])
    fields: dict[str, Any] = {
        "template_hash": template_hash,
        "model": identity.get("model") or record.model,
        "model_root": identity.get("model_root"),
        "tokenizer": identity.get("tokenizer"),
        "vllm_version": identity.get("vllm_version"),
        "sampling_digest": _digest(sampling),
        "weight_version": record.weight_version,
    }
    return Certificate(_digest([fields[c] for c in _COLUMNS])[:32], sampling=sampling, **fields)
