"""Imported by Python at start-up in every process of a launch whose PYTHONPATH holds this folder
(fault_injection.env() puts it there): arms the faults the launch's environment asks for."""
import fault_injection

fault_injection.install()
