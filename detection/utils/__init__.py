"""Small helpers that every layer may import (they import nothing of detection)."""
