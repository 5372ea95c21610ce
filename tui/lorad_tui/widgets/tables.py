"""Small readings of Textual's DataTable that several screens need."""

from __future__ import annotations

from textual.widgets import DataTable


def key_under_cursor(table: DataTable) -> str | None:
    """The key of the row under ``table``'s cursor, or None when the table is empty."""
    if not table.row_count:
        return None
    row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
    return row_key.value
