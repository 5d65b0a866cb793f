//! `rank_pattern` / `alpha_pattern` keep the user's order from the LoRA settings through the
//! `adapter_config.json` we write and back: PEFT gives each module the value of the FIRST key (in the
//! dict's insertion order) whose `(.*\.)?(KEY)$` matches its name, so the order is part of the meaning.

use adapters::{BaseShape, ExpertLayout, Proj, Site};
use candle_core::{Device, Tensor};
use trainer::lora::{peft, LoraPlan, LoraSettings};

const LAYER0_Q: &str = r"layers\.0\.self_attn\.q_proj";
const LAYER0_V: &str = r"layers\.0\.self_attn\.v_proj";

#[test]
fn pattern_order_survives_our_adapter_config_json() {
    let base = BaseShape {
        num_layers: 2,
        hidden_size: 16,
        intermediate_size: 32,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 8,
        num_experts: None,
    };
    let mut settings =
        LoraSettings { r: 8, alpha: 16.0, targets: vec!["q_proj".into(), "v_proj".into()], ..LoraSettings::default() };
    // `q_proj` first: every q_proj gets rank 4, the layer-0 key is never reached (sorted, it would come
    // first and give layer 0 rank 2). Same for the alphas.
    settings.rank_pattern.insert("q_proj".into(), 4);
    settings.rank_pattern.insert(LAYER0_Q.into(), 2);
    settings.alpha_pattern.insert("v_proj".into(), 8.0);
    settings.alpha_pattern.insert(LAYER0_V.into(), 64.0);
    let plan = LoraPlan::new(settings.clone()).unwrap();
    let mut tensors = Vec::new();
    for site in base.sites() {
        if !settings.targets.iter().any(|t| t == site.short()) {
            continue;
        }
        let r = plan.module(&site.module_name()).r;
        let (out, inp) = base.dims(site);
        let a = Tensor::full(0.01f32, (r, inp), &Device::Cpu).unwrap();
        let b = Tensor::full(0.02f32, (out, r), &Device::Cpu).unwrap();
        tensors.push((adapters::adapter::lora_tensor_name(site, 'A'), a));
        tensors.push((adapters::adapter::lora_tensor_name(site, 'B'), b));
    }
    let adapter = adapters::Adapter::from_internal(peft::lora_spec(&settings), None, tensors, &base).unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapters::write_adapter(&adapter, &base, dir.path(), ExpertLayout::Fused).unwrap();

    // The file lists the keys in the user's order...
    let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let at = |needle: &str| text.find(needle).unwrap_or_else(|| panic!("{needle} not in {text}"));
    assert!(at("\"q_proj\": 4") < at(r#""layers\\.0\\.self_attn\\.q_proj": 2"#), "{text}");
    assert!(at("\"v_proj\": 8.0") < at(r#""layers\\.0\\.self_attn\\.v_proj": 64.0"#), "{text}");
    // ...and reading it keeps them in that order.
    let cfg = adapters::PeftConfig::load(dir.path()).unwrap();
    assert_eq!(cfg.rank_pattern.0, vec![("q_proj".to_string(), 4), (LAYER0_Q.to_string(), 2)]);
    assert_eq!(cfg.alpha_pattern.0, vec![("v_proj".to_string(), 8.0), (LAYER0_V.to_string(), 64.0)]);

    // Read back, every module has the rank and alpha PEFT picks.
    let back = adapters::read_adapter(dir.path(), &base).unwrap();
    for l in 0..2 {
        let q = &back.modules[&Site::Attn(l, Proj::Q)];
        assert_eq!((q.rank(), q.alpha), (4, 16.0), "layer {l} q_proj");
        let v = &back.modules[&Site::Attn(l, Proj::V)];
        assert_eq!((v.rank(), v.alpha), (8, 8.0), "layer {l} v_proj");
    }
    // And continuing training from it gives the same settings per module.
    let again = LoraPlan::new(peft::lora_settings(&back.spec)).unwrap();
    assert_eq!(again.module("model.layers.0.self_attn.q_proj").r, 4);
    assert_eq!(again.module("model.layers.0.self_attn.v_proj").alpha, 8.0);
}
