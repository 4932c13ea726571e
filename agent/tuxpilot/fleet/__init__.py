"""Many hosts on one bus: the fleet's identities (NATS operator mode), enrolment and revocation."""
