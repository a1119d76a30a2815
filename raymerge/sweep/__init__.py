"""What the user asked for: the spec (pydantic models, strict YAML), the plan (lazy expansion,
merge identity, pre-flight checks) and search (asks Optuna, tells it scores)."""
