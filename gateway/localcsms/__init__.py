"""The gateway as the site's local CSMS: authorization while upstream is away, site power
management, the site clock."""
