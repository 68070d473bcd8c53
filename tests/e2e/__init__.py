"""kind end-to-end tier: collected only with EXTCONN_E2E=1 (`make e2e`); see conftest.py."""
