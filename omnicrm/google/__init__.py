"""Google: OAuth grants (`auth`) and API clients (`clients`). Heavy libraries load inside functions."""
