"""Schemathesis hooks for the server's API test (loaded through SCHEMATHESIS_HOOKS)."""

import schemathesis

# every generated completion stays this short, so the run's time goes to many requests, not to decoding
MAX_TOKENS = 4


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
