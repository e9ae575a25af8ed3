"""Automation: nightly schedules per site time zone and landing-zone sensors."""

from schedules.landing_sensor import landing_sensor, landing_sensors
from schedules.nightly import NIGHTLY_CRON, nightly_schedules

__all__ = ["NIGHTLY_CRON", "landing_sensor", "landing_sensors", "nightly_schedules"]
