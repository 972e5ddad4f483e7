"""The routes of the /1.0 API, one module per resource."""
