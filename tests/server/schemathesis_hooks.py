"""Schemathesis hooks for the server's API test (loaded through SCHEMATHESIS_HOOKS)."""

import schemathesis

# every generated completion stays this short, so the run's time goes to many requests, not to decoding
MAX_TOKENS = 4


@schemathesis.hook
def before_call(context, case, **kwargs):
    if not isinstance(case.body, dict) or not case.path.endswith("completions"):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = case.body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            case.body[field] = MAX_TOKENS
    if "max_tokens" not in case.body and "max_completion_tokens" not in case.body:
        case.body["max_tokens"] = MAX_TOKENS
