//! Reading and writing cases in the `../shared/conformance` format (safetensors with the config
//! in the metadata), so the crate can be checked against any other implementation.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostBuffer, HostTensor};

/// Element data of one stored tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum CaseData {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// i64 elements.
    I64(Vec<i64>),
}

/// One stored tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseTensor {
    /// The shape.
    pub shape: Vec<usize>,
    /// The elements.
    pub data: CaseData,
}

/// A case file: tensors, config and layer index.
#[derive(Clone, Debug)]
pub struct Case {
    /// The file it was read from.
    pub path: String,
    /// The metadata's config, or the defaults when the file carries none (`config_present`).
    pub config: Config,
    /// Whether the case holds a configuration.
    pub config_present: bool,
    /// The layer index.
    pub layer_idx: usize,
    /// The description.
    pub description: String,
    /// Metadata, by key.
    pub metadata: HashMap<String, String>,
    /// The tensors, by name.
    pub tensors: HashMap<String, CaseTensor>,
}

fn format_err(path: &str, detail: impl Into<String>) -> Error {
    Error::Format { path: path.to_string(), detail: detail.into() }
}

impl Case {
    /// Loads a case; the config and layer index come from the metadata.
    pub fn load(path: impl AsRef<Path>) -> Result<Case> {
        let p = path.as_ref().display().to_string();
        let bytes = std::fs::read(path.as_ref()).map_err(|source| Error::Io { path: p.clone(), source })?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| format_err(&p, e.to_string()))?;
        let metadata: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).map_err(|e| format_err(&p, e.to_string()))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let raw = view.data();
            let data = match view.dtype() {
                Dtype::F32 => CaseData::F32(bytemuck::pod_collect_to_vec(raw)),
                Dtype::F16 => CaseData::F16(bytemuck::pod_collect_to_vec(raw)),
                Dtype::BF16 => CaseData::BF16(bytemuck::pod_collect_to_vec(raw)),
                Dtype::I64 => CaseData::I64(bytemuck::pod_collect_to_vec(raw)),
                other => return Err(format_err(&p, format!("tensor `{name}` has unsupported dtype {other:?}"))),
            };
            tensors.insert(name, CaseTensor { shape: view.shape().to_vec(), data });
        }
        let config = match metadata.get("config") {
            Some(json) => Config::from_json(json).map_err(|e| format_err(&p, format!("metadata `config`: {e}")))?,
            None => Config::default(),
        };
        let config_present = metadata.contains_key("config");
        let layer_idx = match metadata.get("layer_idx") {
            Some(s) => s.trim().parse().map_err(|_| format_err(&p, format!("metadata `layer_idx` = {s:?}")))?,
            None => 0,
        };
        let description = metadata.get("description").cloned().unwrap_or_default();
        Ok(Case { path: p, config, config_present, layer_idx, description, metadata, tensors })
    }

    /// Whether the case holds tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn get(&self, name: &str) -> Result<&CaseTensor> {
        self.tensors.get(name).ok_or_else(|| format_err(&self.path, format!("no tensor `{name}`")))
    }

    /// A floating-point tensor widened to f32, with its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self.get(name)?;
        let v = match &t.data {
            CaseData::F32(v) => v.clone(),
            CaseData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            CaseData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            CaseData::I64(_) => return Err(format_err(&self.path, format!("`{name}` is i64, expected a float"))),
        };
        Ok((v, t.shape.clone()))
    }

    /// An integer tensor, with its shape.
    pub fn i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let t = self.get(name)?;
        match &t.data {
            CaseData::I64(v) => Ok((v.clone(), t.shape.clone())),
            _ => Err(format_err(&self.path, format!("`{name}` is a float, expected i64"))),
        }
    }

    /// A rank-4 float tensor in its stored dtype.
    pub fn tensor4(&self, name: &str) -> Result<HostTensor> {
        let t = self.get(name)?;
        let shape: [usize; 4] = t
            .shape
            .clone()
            .try_into()
            .map_err(|_| format_err(&self.path, format!("`{name}` has shape {:?}, expected rank 4", t.shape)))?;
        let data = match &t.data {
            CaseData::F32(v) => HostBuffer::F32(v.clone()),
            CaseData::F16(v) => HostBuffer::F16(v.clone()),
            CaseData::BF16(v) => HostBuffer::BF16(v.clone()),
            CaseData::I64(_) => return Err(format_err(&self.path, format!("`{name}` is i64, expected a float"))),
        };
        Ok(HostTensor { data, shape })
    }
}

/// Collects tensors and metadata, then writes one safetensors file.
#[derive(Default)]
pub struct CaseWriter {
    tensors: Vec<(String, CaseTensor)>,
    metadata: HashMap<String, String>,
}

impl CaseWriter {
    /// An empty case.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets metadata `key` to `value`.
    pub fn meta(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.metadata.insert(key.to_string(), value.into());
        self
    }
    /// Adds tensor `name` of `shape` holding `data`.
    pub fn put(&mut self, name: &str, shape: &[usize], data: CaseData) -> &mut Self {
        self.tensors.push((name.to_string(), CaseTensor { shape: shape.to_vec(), data }));
        self
    }
    /// Adds tensor `name`, a copy of `t`.
    pub fn put_tensor(&mut self, name: &str, t: &HostTensor) -> &mut Self {
        let data = match &t.data {
            HostBuffer::F32(v) => CaseData::F32(v.clone()),
            HostBuffer::F16(v) => CaseData::F16(v.clone()),
            HostBuffer::BF16(v) => CaseData::BF16(v.clone()),
        };
        self.put(name, &t.shape, data)
    }
    /// Writes the case to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let p = path.as_ref().display().to_string();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let (dtype, bytes): (Dtype, &[u8]) = match &t.data {
                    CaseData::F32(v) => (Dtype::F32, bytemuck::cast_slice(v)),
                    CaseData::F16(v) => (Dtype::F16, bytemuck::cast_slice(v)),
                    CaseData::BF16(v) => (Dtype::BF16, bytemuck::cast_slice(v)),
                    CaseData::I64(v) => (Dtype::I64, bytemuck::cast_slice(v)),
                };
                safetensors::tensor::TensorView::new(dtype, t.shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| format_err(&p, format!("tensor `{name}`: {e}")))
            })
            .collect::<Result<_>>()?;
        let meta = Some(self.metadata.clone());
        safetensors::serialize_to_file(views, meta, path.as_ref()).map_err(|e| format_err(&p, e.to_string()))
    }
}

/// Converts a dtype to the safetensors one.
pub fn safetensors_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}
