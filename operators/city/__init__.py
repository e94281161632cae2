"""The city operator: reconciles SensorFleet, AnalyticsModel, Scenario and Incident in a city cluster."""
