"""Exports for people outside the toolkit: the clinician questionnaire (REDCap, LimeSurvey, printable booklet)."""
