"""`adarevd report`: the run page, its charts and the exit-depth pictures."""
