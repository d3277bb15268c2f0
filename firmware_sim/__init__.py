"""Simulated peers for tests and the demo: devices, a webhook sink and a cellular modem."""
