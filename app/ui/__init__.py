"""The web dashboard: server-rendered pages under ``/ui`` for people (Jinja2 templates, a few
lines of plain JavaScript, every asset served by this app). The pages call the same service layer
and owner rules as the API; like ``app.api`` this package never imports torch, ``models`` or
``worker``."""

UI_PREFIX = "/ui"
