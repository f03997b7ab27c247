"""Which instances may serve a request, in what order, and why: requirements, scoring,
the planner, sessions. Reads live state; sends nothing."""
