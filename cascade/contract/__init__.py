"""The quality contract: hold ``min_agreement`` with the LLM (or an LLM budget) live, with a guarantee.

Pure algorithms (numpy + stdlib + river), no Kafka or Redis; the engine wires them in:

* :mod:`cascade.contract.audit` - which cheap answers are also asked of the LLM (a hash draw).
* :mod:`cascade.contract.estimator` - anytime-valid lower bound on the agreement of delivered answers.
* :mod:`cascade.contract.controller` - per-tier deferral thresholds that hold the contract.
"""

from cascade.contract.audit import AuditSampler
from cascade.contract.controller import ContractController, ControlOutput
from cascade.contract.estimator import (
    AgreementEstimate,
    AgreementEstimator,
    BettingLowerBound,
    TierEstimate,
)

__all__ = [
    "AgreementEstimate",
    "AgreementEstimator",
    "AuditSampler",
    "BettingLowerBound",
    "ContractController",
    "ControlOutput",
    "TierEstimate",
]
