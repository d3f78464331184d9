"""Guests: SSH sessions into them and what they show."""
