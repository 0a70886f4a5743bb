"""
Tests for L{mtlsproxy_example}.
"""
