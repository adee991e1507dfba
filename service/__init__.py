"""Booking durability service: durable booking emails, flag-steered kill-switches and
policy-resilient table confirmation, run as Dramatiq workers."""
