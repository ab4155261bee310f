"""Schemathesis hooks for the server's API test (loaded through SCHEMATHESIS_HOOKS)."""

import json

import schemathesis

# every generated completion stays this short, so the run's time goes to many requests, not to decoding
MAX_TOKENS = 4
# A prompt longer than the server's context (512 tokens in the tests) is a 400 that no schema can express. The
# embedded model's tokenizer is byte-level BPE, which never makes more tokens than bytes, so a body whose prompt
# material (messages, prompt, tools; as JSON, keys and quotes over-counting the chat template's own tokens) fits in
# this many bytes leaves room for the template's default system prompt and MAX_TOKENS.
PROMPT_BYTES = 320


def _largest_number(value) -> float:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return max(map(_largest_number, value), default=0)
    return abs(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


@schemathesis.hook
def filter_body(context, body):
    # Schemathesis may carry an integer of 2^53 or more through a float and its shortest decimal form (int64's least,
    # seed's bound, reached the server as -9223372036854776000), so the body it sends is not the one it validated.
    if _largest_number(body) >= 2**53:
        return False
    if not isinstance(body, dict) or context.operation is None or not context.operation.path.endswith("completions"):
        return True
    material = {field: body[field] for field in ("messages", "prompt", "tools") if field in body}
    return len(json.dumps(material, ensure_ascii=False).encode("utf-8", "surrogatepass")) <= PROMPT_BYTES


@schemathesis.hook
def before_call(context, case, **kwargs):
    if not isinstance(case.body, dict) or not case.path.endswith("completions"):
        return
    capped = {}
    for field in ("max_tokens", "max_completion_tokens"):
        value = case.body.get(field)
        # JSON's 1e9 is an integer too: it arrives as a float
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_TOKENS:
            capped[field] = MAX_TOKENS
    if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:  # null: no limit
        capped["max_tokens"] = MAX_TOKENS
    if capped:  # a new body: the generated one may be shared with other cases
        case.body = {**case.body, **capped}
