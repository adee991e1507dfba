"""Booking emails: which email a status calls for, rendering, SMTP transport, delivery records."""
