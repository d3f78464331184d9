"""The virtual KVM lab: KVM hosts as VMs under TCG, and their image."""
