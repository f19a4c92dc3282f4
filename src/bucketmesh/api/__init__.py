"""The Rating API (docs/api.md): HTTP routes from requests onto the decision seam."""
