"""The agent's systemd unit and example config, for operators to read here and for
`edgefleet-agent install-service` to load. The wheel ships this folder as edgefleet.systemd."""
