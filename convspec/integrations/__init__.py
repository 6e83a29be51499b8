"""Exporters from compiled plans to other libraries' conversion formats."""
