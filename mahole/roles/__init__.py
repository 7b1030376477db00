"""The three roles: intermediate, connector, agent."""
