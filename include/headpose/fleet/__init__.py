"""The device fleet: channel membership and device reports, rollout decisions, the Greengrass component."""
