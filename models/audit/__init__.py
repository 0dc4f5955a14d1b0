"""The offline audit of one model version: concepts, retrieval, localization and discovery.

:func:`run_audit` is the batch job a quality team runs on a model and a dataset with artifact
annotations, any :class:`~medaudit.models.data.protocol.AnnotatedDataset`. It chains the XAI core:

1. **One pass** of the :class:`~medaudit.models.xai.lrp.Explainer` over the audited samples of the
   train, val and test splits, collecting per image the max-pooled activations φ(x) at every CAV
   layer, the input heatmap of the predicted class and the channel relevance at ℓ (method.md §0
   step 2: ``cavs_max``, ``hm``, ``rels_max``; :mod:`.collect`).
2. **Concepts**: a :class:`~medaudit.models.xai.concepts.ConceptBank` per CAV layer, fitted on the
   training split (labels from the dataset's artifact membership, inside each concept's class
   scope, method.md §1.1) and calibrated on clean validation images (:mod:`.concepts`).
3. **Retrieval**: AUROC/AP/Kendall τ of s(x) = ⟨φ(x), v⟩ on the test split (held out) and on
   every audited sample ("all", the authors' optimistic number; method.md §1.5, §11.14).
4. **Localization**: CAV-conditioned heatmaps (initial relevance ReLU(A) ⊙ v at ℓ, method.md
   §2.1) of test images that carry the artifact, binarised (§2.2) and scored by IoU and ρ against
   the ground-truth masks (§2.3), where the dataset has masks.
5. **Discovery** (method.md §6, :mod:`.discovery`): SpRAy outliers among the input heatmaps of
   each class (data perspective) and outlying channels of the relevance at ℓ (model
   perspective), each ranked with its evidence, and the undeclared annotated artifacts counted
   among them.

The result is an :class:`AuditReport` (frozen, :mod:`.results`), whose
:meth:`AuditReport.to_json` is the ``metrics.json`` of the report folder;
:func:`medaudit.models.audit.report.write_report` renders the rest as one HTML page.

The package sits above the XAI core and the datasets and knows nothing of the service or the
command line.
"""

from medaudit.models.audit.options import DEFAULT_CONCEPT_LAYERS, AuditOptions, default_concept_layers
from medaudit.models.audit.results import (
    AuditReport,
    ConceptAudit,
    Discovery,
    LocalizedSample,
    Outlier,
    write_metrics,
)
from medaudit.models.audit.run import run_audit

__all__ = [
    "DEFAULT_CONCEPT_LAYERS",
    "AuditOptions",
    "AuditReport",
    "ConceptAudit",
    "Discovery",
    "LocalizedSample",
    "Outlier",
    "default_concept_layers",
    "run_audit",
    "write_metrics",
]
