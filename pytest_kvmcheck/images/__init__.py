"""Images built from Debian packages: the tiny guest, a disk-image guest."""
