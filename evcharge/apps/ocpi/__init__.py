"""The OCPI edge (``evcharge ocpi``): an operator's CPO interface toward roaming platforms."""

# Here rather than in edge.py, so the CLI can show it without importing aiohttp.
DEFAULT_PORT = 8090
VERSION = "2.2.1"
