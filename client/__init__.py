"""medisyn.client"""
