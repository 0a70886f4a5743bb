"""
mtlsproxy's test suite (run with C{python -m twisted.trial tests}).

Hypothesis runs without its per-example deadline here: CI machines have two
cores shared with real proxies and backends started by the integration
tests, so an example's wall-clock time says nothing about the code.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "mtlsproxy", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("mtlsproxy")
