"""mkdocs hook: the generated reference pages (filled in below)."""
