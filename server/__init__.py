"""medisyn.server"""
