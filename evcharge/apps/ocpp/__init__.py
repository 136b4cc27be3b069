# Here rather than in gateway.py, so the CLI can show it without importing the OCPP libraries.
DEFAULT_PORT = 9000
