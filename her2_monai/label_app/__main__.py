"""Print the app folder for ``monailabel start_server --app "$(python -m her2_monai.label_app)"``."""

from __future__ import annotations

from her2_monai.label_app import APP_DIR

if __name__ == "__main__":
    print(APP_DIR)
