"""lightrnn_cross_entropy: the cross-entropy of a LightRNN model from its factorized softmax.

-log P(w) = -log P_r(r(w) | h) - log P_c(c(w) | h, r(w)) (Li et al., NeurIPS 2016): the same loss as
``cross_entropy`` on the model's full-vocabulary log-probabilities, without computing the column
distributions of the R - 1 rows the target is not in (R + C logits per token instead of V).
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig

from grnn_fairseq.errors import ConfigError


@dataclass
class LightRNNCrossEntropyConfig(CrossEntropyCriterionConfig):
    pass


@register_criterion("lightrnn_cross_entropy", dataclass=LightRNNCrossEntropyConfig)
class LightRNNCrossEntropyCriterion(CrossEntropyCriterion):
    """``cross_entropy`` for ``--lightrnn`` models; logs the same loss, nll_loss and ppl."""

    def compute_loss(self, model, net_output, sample, reduce=True):
        vocab = model.decoder.lightrnn
        if vocab is None:
            raise ConfigError("--criterion lightrnn_cross_entropy needs a model built with --lightrnn")
        target = model.get_targets(sample, net_output)  # B x T
        lprobs = vocab.target_log_probs(net_output[0], target)  # B x T x D -> B x T
        nll = -lprobs.masked_fill(target.eq(self.padding_idx), 0.0)  # B x T, padding adds nothing
        loss = nll.sum() if reduce else nll.view(-1)
        return loss, loss
