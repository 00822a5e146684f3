"""Hardware profile files; shipped in the wheel as edgefleet.profiles.
The TOML files beside this module are data, read by edgefleet.hardware.loading."""
