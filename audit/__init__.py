"""medisyn.audit"""
