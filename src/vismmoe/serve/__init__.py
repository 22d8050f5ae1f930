"""The OpenAI-compatible server: schema (request fields), media (where images come from), scheduler (queue and
batches on the engine thread), metrics (Prometheus), app (the HTTP routes), cli (`vismmoe serve`)."""
