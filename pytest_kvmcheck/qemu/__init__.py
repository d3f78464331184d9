"""QEMU: VM specs and argv, the VM lifecycle, the monitor, migration, the handbook's legacy forms."""
